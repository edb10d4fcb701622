"""Gates a task passes besides placement: quotas and locks (the `Admission` interface in
base), circuit breakers, backpressure at submit, and the token bucket behind rate limits;
`keys` writes the keys they hold tasks under."""
