"""The WARM recipe around the merge: preference data, diverse fine-tuning, and the demo.

The merge core (the rest of `merger/`) never imports the service or the client; the recipe
may: the demo runs every part of the project, so it imports upward.
"""
