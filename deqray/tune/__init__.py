"""Sweeps: study files (search_spaces/*.yaml), Ray Tune + Optuna runs, Pareto fronts."""
