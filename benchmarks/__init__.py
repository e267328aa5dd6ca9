"""Re-runnable benchmarks of bnfold (folding speedup, fold cost, serving); see benchmarks/README.md."""
