"""Integrations with model libraries. Import the submodule you need (e.g.
``fot_kernels.integrations.transformers``); nothing is imported or registered here."""
