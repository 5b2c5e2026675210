"""A replica's sandbox: namespaces and mounts by bubblewrap, limits by cgroups.

``bwrap`` builds the argv that starts the runtime inside its own mount, PID
and IPC namespaces; ``cgroups`` caps memory, CPU and processes for the whole
replica; ``probe`` says what this host can do, in one line.
"""
