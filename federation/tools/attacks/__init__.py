"""Attacks on MORE ciphertexts: what anyone who knows the scheme recovers without the key.

MORE encrypts ``x`` as ``C = S diag(x, r) S^-1`` (design note, section 8). The attacks
(``maths``) read only ciphertext entries ``[..., 2, 2]``:

- the eigenvalues of ``C`` are ``{x, r}``; trace and determinant give them
  (:func:`maths.eigenvalue_pairs`);
- all ciphertexts under one key share their eigenvectors, the columns of ``S``, so
  diagonalising one ciphertext gives an equivalent key for every other one
  (:func:`maths.equivalent_key`, :func:`maths.channels`);
- one bit is left for the whole key: which channel is the data. One known
  plaintext/ciphertext pair settles it (:func:`maths.resolve_known_pair`), so, mostly, do the
  statistics of the data (:func:`maths.resolve_by_statistics`,
  :func:`maths.resolve_by_supervision`, :func:`maths.resolve_by_evaluation`). (The public key
  fingerprint used to settle it too, for float64 ciphertexts: it hashed the key's columns in
  order. It is now salted with a secret part of the key, so it cannot confirm a recovered key.)

:func:`run.run_attack` applies them to a task's encrypted data and to the encrypted model
updates an aggregator receives. It uses the key to make the ciphertexts (as a site does) and
to score the attack afterwards, never inside an attack. ``results`` holds what it measured,
``plots`` and ``report`` write the figures and ``report.md``.
"""
