"""An example third-party package for Shoal nodes: the `wordcount` executor and two tools."""
