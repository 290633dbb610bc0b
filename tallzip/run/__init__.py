"""How work runs: the memory budget, chunk sizes, the one ordered bounded map (the scheduler pack, extract,
verify and merge share), CPU counts and thread settings, and the engines (local threads, Ray)."""
