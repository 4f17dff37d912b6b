"""hvmlab hypervisor: vCPUs under Unicorn, the VMCS, exits and their dispatch (Intel SDM Vol. 3C)."""
