"""How a new adapter's factors start: PEFT's random draws (`random_init`) or values taken from
the base weight, PiSSA / OLoRA / LoftQ / orthogonal (`from_base`)."""
