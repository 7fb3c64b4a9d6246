"""Fine-tuning: the recipe (recipe.py, setup -> fit -> validate -> save) and the pieces it runs, each in a module
named for its job: batches, loss, features (the cached image side), checkpoint and state."""
