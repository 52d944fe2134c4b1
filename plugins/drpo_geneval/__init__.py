"""GenEval's correctness rules (``drpo_geneval.rules``), shared by the toy world's counting ranker and
the GenEval ranker to come. Pure Python; this package registers no hooks (yet), so it has no entry point.
"""
