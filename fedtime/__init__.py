"""What both Flower apps, the centralized trainer and the benches share: the run config (`config`), the
messy-federation scenario every party derives from it (`scenario`), data, model and training settings built from
it (`task`) and the schema of the results.json both kinds of run write (`results`). Imports no Flower;
`fedtime.config` and `fedtime.results` import no torch either. See docs/architecture.md."""
