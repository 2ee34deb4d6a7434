"""What both Flower apps, the centralized trainer and the benches share: the run config (`config`), the
messy-federation scenario every party derives from it (`scenario`), and data, model and training settings built
from it (`task`). Imports no Flower; `fedtime.config` imports no torch either. See docs/architecture.md."""
