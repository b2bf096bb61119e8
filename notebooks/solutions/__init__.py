"""Solutions to the notebooks' build-it-yourself cells, one module per notebook; notebooks/exercises.py grades them.
Try the exercise first: each grader says what is wrong with an attempt."""
