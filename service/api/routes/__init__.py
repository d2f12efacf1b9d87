"""One router per resource: fixations, streams, model, health."""
