"""ppvilg deployment runtime: the text tokenizer, numpy decoding algorithms and Paddle Inference predictors
over a folder written by tools/export_model.py. It never imports the training package (ppvilg)."""
