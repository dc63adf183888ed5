"""nanowaltz's machinery: everything the five method files at the top (reward.py, rollout.py, train.py, infer.py,
eval.py) build on, and nothing they define. The package never imports a method file (tests/test_layout.py), so each
module here can be read, tested and reused on its own.
"""
