"""The one evaluator, its metrics (episodes, text, statistics) and exact occupancy measures."""
