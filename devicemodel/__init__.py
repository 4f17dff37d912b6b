"""hvmlab device model: the ioreq server and PC devices as pure state machines (QEMU hw/, Xen ioreq.h)."""
