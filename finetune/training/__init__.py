"""Training: the compiled steps (`step`), the fit/evaluate/predict loop (`trainer`), callbacks, metrics, tasks."""
