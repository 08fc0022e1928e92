"""The engine: Accelerate-facing and model-agnostic; it trains any ``Workload`` and imports none."""
