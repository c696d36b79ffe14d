"""The demos: the paper's toy regression with its baselines, and the classification comparison.

Not part of the library: ``import l2m_fast`` never imports this package (nor matplotlib or scikit-learn,
which it needs). The ``l2m-fast demo`` and ``l2m-fast eval`` commands run it.

* :mod:`.toy`, :mod:`.regression`, :mod:`.report`: the toy regression, its scores, figure and tables;
* :mod:`.classification`: the digits comparison;
* :mod:`.baselines`: the other methods, one module each;
* :mod:`.l2m_method`, :mod:`.metrics`, :mod:`.common`: what the demos share.
"""
