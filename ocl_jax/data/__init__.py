"""Data: TFDS and image-folder sources, box and mask annotations, train and eval readers, scenes."""
