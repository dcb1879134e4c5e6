"""What operators run beside a federation: ``more-fl run`` (``launch``), ``more-fl deploy`` and
``more-fl site`` (``deploy/``), ``more-fl bench`` (``bench/``), ``more-fl attack`` (``attacks/``),
``more-fl verify`` (``verify``), ``more-fl new`` (``scaffold``) and ``more-fl data inspect``
(``datareport``). Nothing in the library below imports them."""
