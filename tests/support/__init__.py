"""What several test modules share (namespaces, fakes, waits, time windows); no tests here.

Test modules import from here, never from each other. What bench/ needs too
lives in the package (remus.powercut, remus.vm) and is imported from there.
"""
