"""Quality suite: does low-bit optimizer state cost anything measurable on small real tasks?

    python -m benchmarks.quality.run [--quick] [--seeds 3] [--tasks ...] [--optimizers ...] [--out benchmarks/results]
"""
