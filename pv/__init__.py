"""hvmlab paravirtual path: hypercalls, grant tables, rings, XenStore and backends (Xen public headers)."""
