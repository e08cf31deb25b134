"""Tables and plots made from run directories."""
