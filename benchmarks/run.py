"""Same as `python -m walsvc.bench.run` (options in README.md beside this file), runnable from a checkout."""
import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from walsvc.bench.run import main  # noqa: E402
sys.exit(main())
