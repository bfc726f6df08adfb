"""pgws's benchmark: see bench/README.md."""
