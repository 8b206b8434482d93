"""Load tests and capacity planning for any Open Inference Protocol server (`convoy loadtest`,
`convoy capacity`). Only cli.py is imported by `convoy`; the rest loads locust on demand."""
