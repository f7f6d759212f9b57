"""Peer editing methods, implemented here from their papers, served through the harness's Method protocol."""
