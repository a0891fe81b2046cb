"""`python3 -m tests`: run the whole suite and end with a plain 'N passed, N failed' line."""
import os
import sys
import unittest

here = os.path.dirname(os.path.abspath(__file__))
suite = unittest.defaultTestLoader.discover(here, top_level_dir=os.path.dirname(here))
result = unittest.TextTestRunner(verbosity=2).run(suite)
failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
passed = result.testsRun - failed - len(result.skipped)
print("%d passed, %d failed, %d skipped" % (passed, failed, len(result.skipped)))
sys.exit(0 if result.wasSuccessful() and result.testsRun else 1)
