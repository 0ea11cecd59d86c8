"""Overload control: queueing-delay pressure at the downstreams, the view of it at ingress, and
what a shed request of each traffic class gets."""
