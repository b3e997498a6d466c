"""The data layer's dataset-not-found error, in a leaf module.

Both the TFDS access (sources) and the image folders (folders) raise it, and
sources dispatches to folders; defining it here keeps the imports acyclic.
"""


class DatasetNotFoundError(FileNotFoundError):
  """A TFDS dataset is not prepared in the data dir the config points to."""
