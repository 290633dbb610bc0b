"""Reading an archive: the Archive object (tasks, tensors, a public chunk API: plan, base/mtv/mask/own
chunks, rebuild) and extract (a task's checkpoint written back as it came)."""
