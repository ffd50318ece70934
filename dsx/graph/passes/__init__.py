"""The built-in graph passes, one per module; ``dsx.graph.pass_manager`` declares their run order.

Each module holds its pattern and rewrite only; shared matching helpers live in ``dsx.graph.fx_utils``.
"""
