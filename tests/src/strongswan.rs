//! strongSwan (charon + swanctl) as a reference peer.
