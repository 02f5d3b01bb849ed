"""Quality evaluation: evaluation windows, logit runners, metrics and adapter survival."""
