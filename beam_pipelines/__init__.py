"""Apache Beam pipelines: source label counts, target soft-label histogram P_t,
importance weights w(y) = P_t(y) / P_s(y) (:mod:`.importance_weights`), and
the source's near-duplicates of a target's images (:mod:`.near_duplicates`).
The mathematics: docs/design.md, "Weights"."""
