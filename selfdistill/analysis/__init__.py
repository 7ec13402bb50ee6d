"""What training changed in the weights: the update analysis of arXiv 2606.13657 and coordinate masks."""
