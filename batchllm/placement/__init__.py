"""Placement: the VRAM fit rule and placement decisions, as pure functions (data in, decisions out).

Below the scheduler and the services, which both place work: ``fit`` (can a worker host a model variant,
and the numbers that say why), ``variants`` (which variant a batch runs; refusing what nobody can host) and
``assign`` (which model each worker should host, given demand).
"""
