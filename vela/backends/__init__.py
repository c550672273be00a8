"""Where a cache's segment lives. Backends differ only in how the memory is obtained."""
