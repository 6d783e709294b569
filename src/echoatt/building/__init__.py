"""The student made from the teacher and a plan: its weights copied, its followers calibrated, what stands in for a
removed part fitted, each changed layer repaired on its own."""
