"""Apache Beam pipelines: source label counts, target soft-label histogram P_t,
importance weights w(y) = P_t(y) / P_s(y) (DESIGN.md §1-2)."""
