"""The benchmark suite's entry point from a checkout (same as `walsvc bench`; options in README.md beside this file)."""
import pathlib
import sys

if __name__ == "__main__":  # the guard: scenarios that spawn workers import this module again
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from benchmarks.suite.run import main
    sys.exit(main())
