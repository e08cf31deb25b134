"""Executors of a schedule. An engine never knows which method it runs."""
