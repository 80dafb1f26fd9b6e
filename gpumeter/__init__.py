"""gpumeter: GPU usage metering, subsidised billing and alerts for an AI supercomputing centre."""
