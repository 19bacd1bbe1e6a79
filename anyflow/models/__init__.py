"""Model-side code for the diffusers AnyFlow classes: checkpoint loading (:mod:`anyflow.models.loading`).

Nothing is imported here so that ``import anyflow.models`` stays free of diffusers.
"""
