"""The training data's path, in its order: source, columns, text or images, labels, batches."""
