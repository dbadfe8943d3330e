"""Ray jobs built on the mtcnn library: annotate, prepare, train, evaluate, submit."""
