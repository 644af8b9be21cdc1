"""Data loaders: ``idx`` (the IDX file format), ``vision`` (MNIST, Fashion-MNIST, CIFAR-10), ``text``.

Everything reads local files; a download happens only when asked for, and missing data is an error that
says how to get it, never a silent stand-in.
"""
