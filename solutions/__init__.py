"""Reference answers to the graded exercises: solutions/exNN_topic.py mirrors exercises/exNN_topic.py name for name.

Grade them like your own work: `pytest tests/exercises --impl=solutions` or `check("rms_norm", impl="solutions")`.
"""
